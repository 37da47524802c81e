
fuzz-a