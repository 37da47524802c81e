

fuzz-draft
/eplb-fuzz-r0
/eplb-fuzz-r1"

w   *cpu