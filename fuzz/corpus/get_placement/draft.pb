

fuzz-draft