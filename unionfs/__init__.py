"""strata's FUSE union filesystem (issue 3). Imports `store`, never `runner`."""
