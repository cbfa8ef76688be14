"""`strata build`: Dockerfiles built on strata's containers and journal (see runner.build.builder)."""
