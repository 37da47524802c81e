
nope0123456789abcdef