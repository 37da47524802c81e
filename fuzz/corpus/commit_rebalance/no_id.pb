
fuzz-a