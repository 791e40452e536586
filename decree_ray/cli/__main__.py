"""`python -m decree_ray.cli ...` is `decree ...`."""

from .commands import main

main()
