"""GAN augmenters: (image, label map) pairs from DCGAN, SAGAN and pix2pix, and their stages.

- `seglab.gan.common`: label <-> channel encoding, scaling, data from shards, losses, sample grids.
- `seglab.gan.dcgan`, `seglab.gan.sagan`, `seglab.gan.pix2pix`: the networks and their training steps.
- `seglab.gan.settings`, `seglab.gan.train`, `seglab.gan.epoch_log`: the `train_gan@<gan>` stage, resumable.
- `seglab.gan.synthesize`: the `synthesize@<gan>` stage (`run_synthesize`, `synthesize`).
- `seglab.gan.validate` (with `checks`, `profile`, `figures`, `suites`): the `validate_synthetic@<gan>` gate.

Submodules import TensorFlow; importing this package does not.
"""

from seglab.config import GAN_NAMES as GANS  # the one list, in params order (synthetic ids rely on it)

__all__ = ["GANS"]
