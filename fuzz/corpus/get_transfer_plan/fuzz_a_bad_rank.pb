
fuzz-a0123456789abcdefÿÿÿÿ