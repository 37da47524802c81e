
fuzz-a
/eplb-fuzz-r0
/eplb-fuzz-r1"

wÄ ‡‘Ä ‡‘Ä "

wÄ ‡‘Ä ‡‘Ä *cpu