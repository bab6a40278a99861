"""Measurement support shared by `sparsespec bench` and the scripts in bench/: paper-scale model shapes with
random weights, and steady-state batches placed at a context length without prefilling them."""
