"""``torchrun ... -m runtime.profile``: every rank measures (runtime.profile.measure)."""

from ..train import exit_rank
from .measure import main

exit_rank(main())
