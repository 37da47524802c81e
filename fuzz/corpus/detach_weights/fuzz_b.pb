
fuzz-b