"""Drop-in integrations of fastad's kernels into other libraries (each imported on
first use, so that fastad does not depend on them)."""
