*
eplb.v1.Placementd