
eplb.v1.ExpertBalancer