"""Defaults of the `priors` config section (owned by lmdir_jax/priors)."""

import ml_collections

from lmdir_jax.errors import UsageError

# Crops per side the degradation controller judges an image by (GRID x GRID native-resolution
# crops, probabilities averaged): 5 x 5 named 95.6 % of the CBSD68 photos right under 8 single
# degradations, 3 x 3 94.3 % (docs/priors.md).
CONTROLLER_GRID = 5


def default_config() -> ml_collections.ConfigDict:
    """Where the frozen models and the prior cache are, and how priors are used in training."""
    c = ml_collections.ConfigDict()
    c.clip = ""  # local Hugging Face CLIP folder ('' = no CLIP: degradation/scene priors masked)
    c.sd = ""  # local diffusers Stable Diffusion folder (only for `lmdir priors build`)
    c.cache = ""  # prior cache folder built by `lmdir priors build`
    c.max_text_len = 32  # CLIP tokens per text (<= 77)
    c.ref_size = 64  # side of the reference image fed to the network
    # DA-CLIP degradation controller (`lmdir priors train-controller`): a trained controller workdir
    # ('' = zero-shot CLIP); the automatic mode (restore, evaluate, auto_ratio, the prior cache)
    # uses it when set.
    c.controller = ""
    c.controller_grid = CONTROLLER_GRID  # native-resolution crops per side (grid x grid, averaged)
    c.controller_content_weight = 0.1  # weight of the content loss in controller training
    # Crops per step in the content loss (the first ones; 0 = all): it runs the frozen tower twice,
    # so a sub-batch makes the step much cheaper while the degradation loss sees every crop.
    c.controller_content_batch = 0
    c.controller_clean_prob = 0.125  # fraction of training crops left undegraded (the 'clean' class)
    # Data echoing (Choi et al. 2019) E: E pipeline batches are pooled and shuffled, and each patch
    # serves E steps (other random crops each time), E * E steps per pool. The tiny controller's
    # step is far cheaper than synthesising its degraded patches, so echoing buys many more steps
    # per CPU second. train.steps and train.ckpt_every must be multiples of E * E.
    c.controller_echo = 1
    # Training: probability of telling an example the automatic mode's choice (the most likely
    # vocabulary entry's text, by zero-shot CLIP or the controller) instead of its label's text.
    c.auto_ratio = 0.0
    # Training: with auto_ratio, tell an entry drawn with the automatic mode's probabilities instead
    # of the most likely one, so that the network is told a wrong name about as often as the
    # automatic mode would nearly give it one (an uncertain guess), and learns to restore all the same.
    c.auto_sample = False
    # Training: probability of telling an example a wrong kind's noun instead of its label's text,
    # so that the network checks the text against the image (an automatic mode's controller is
    # sometimes wrong on real photos; train.step.mislead).
    c.wrong_degradation = 0.0
    # Training-time prior dropout: each prior is masked with this probability.
    c.drop_degradation = 0.1
    c.drop_scene = 0.1
    c.drop_reference = 0.2
    return c


SHARES = ("auto_ratio", "wrong_degradation", "drop_degradation", "drop_scene", "drop_reference")


def check_shares(priors: ml_collections.ConfigDict) -> None:
    """Raise a UsageError for a `priors` probability (`SHARES`) outside [0, 1], so that a typo such
    as auto_ratio=25 is refused instead of silently meaning 'always'."""
    for name in SHARES:
        value = float(priors.get(name, 0.0))
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"priors.{name} must be in [0, 1], got {value:g}")
