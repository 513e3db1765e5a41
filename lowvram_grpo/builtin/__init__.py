"""What the offline demos need, built here rather than downloaded: the tiny model
(`builtin:tiny`), the arithmetic task (`builtin:arith`) and the code tasks (`builtin:code`); the
tiny tools model (`builtin:tiny-tools`) and its calculator task (`builtin:sums`); the example
environment GuessNumber (`builtin:guess-number`)."""
