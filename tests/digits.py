"""Real data for tests: sklearn's handwritten digits (8×8, 0..16), written as 64×64 RGB PNG files."""
from harness.digits import write_digit_folder  # noqa: F401
