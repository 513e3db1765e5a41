"""What the offline demo needs, built here rather than downloaded: the tiny model
(`builtin:tiny`), the arithmetic task (`builtin:arith`) and the code tasks (`builtin:code`)."""
