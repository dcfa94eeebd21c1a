"""GRPO: rollouts, group advantages, clipped loss + KL, dynamic sampling, the step itself."""
