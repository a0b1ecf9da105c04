"""Training JumpReLU SAEs (SPEC.md section 2) in sharded JAX, many SAEs per activation stream."""
