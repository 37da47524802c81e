
fuzz-a
/outside-prefix

/eplb-r1"

w@@@"

w@À@À@*cpu