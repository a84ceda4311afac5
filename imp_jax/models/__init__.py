"""Pure forward functions of the supported model families."""
