
fuzz-a