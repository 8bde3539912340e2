"""GAN augmenters: (image, label map) pairs from DCGAN, SAGAN and pix2pix, and their stages.

- `seglab.gan.common`: label <-> channel encoding, scaling, data from shards, losses, sample grids.
- `seglab.gan.dcgan`, `seglab.gan.sagan`, `seglab.gan.pix2pix`: the networks and their training steps.
- `seglab.gan.train`: the `train_gan@<gan>` stage (`run_train_gan`, `train_gan`), resumable.
- `seglab.gan.synthesize`: the `synthesize@<gan>` stage (`run_synthesize`, `synthesize`).

Submodules import TensorFlow; importing this package does not.
"""

GANS = ("dcgan", "sagan", "pix2pix")

__all__ = ["GANS"]
