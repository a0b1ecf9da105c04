"""Loading Gemma 2 / Gemma 3 models and capturing activations at named sites."""
