"""fewstep_lab: the companion package of an open course on few-step diffusion models.

Everything lives in one sigma-space convention (Karras et al. 2022, "EDM"): a noisy
sample is ``x = x0 + sigma * eps`` and every model is, at sampling time, a denoiser
``D(x, sigma, cond=None) -> x0_hat``.
"""

__version__ = "0.1.0"
