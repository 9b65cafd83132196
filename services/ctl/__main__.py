"""`python -m services.ctl`: the operator commands alone."""

from services.ctl.app import main

main()
