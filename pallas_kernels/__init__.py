"""Attention kernels, each package holding a pure-jnp reference beside its Pallas implementations."""
