
nope