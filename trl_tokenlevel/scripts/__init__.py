"""Training scripts behind the `trl-tokenlevel` command (also runnable with `accelerate launch -m`)."""
