"""The LoadRecorder's shared ring layout (internal), shared by the engine's
process (eplb.recorder) and the sender process (eplb._sender).

Header (int64 words): 0 head (passes published by the engine), 1 tail
(passes taken by the sender), 2 sent, 3 failed, 4 calls, 5 errors,
6 passes_recorded of the last answer, 7 its epoch, 8 ready (the sender's
channel is up); bytes 128..1023: the last error as "CODE\\0message\\0".  The
ring of [capacity, L, P] int64 starts at byte 4096 (page aligned).
"""
HEAD, TAIL, SENT, FAILED, CALLS, ERRORS, RECORDED, EPOCH, READY = range(9)
WORDS = 16
ERR_AT, ERR_END = 128, 1024
HEADER = 4096
