"""gemmascope: harvest Gemma activations, train Gemma Scope JumpReLU SAEs, evaluate and export them."""

__version__ = "0.1.0"
