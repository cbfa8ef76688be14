"""strata's command line and container lifecycle. Imports `unionfs` and `store`."""
