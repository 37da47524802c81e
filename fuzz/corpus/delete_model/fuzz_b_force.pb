
fuzz-b