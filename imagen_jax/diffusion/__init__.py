"""Pure diffusion math (jax / numpy only): schedules, Gaussian process, losses, guidance, samplers.

Conventions (variance preserving, continuous time t in [0, 1]):
  z_t = alpha_t * x + sigma_t * eps,   alpha_t^2 + sigma_t^2 = 1,
  logsnr_t = log(alpha_t^2 / sigma_t^2),
  so alpha_t^2 = sigmoid(logsnr_t) and sigma_t^2 = sigmoid(-logsnr_t).
t = 0 is (almost) clean data, t = 1 (almost) pure noise; logsnr decreases with t.
"""
