
seed-draft-vlmr
KimiK25ForConditionalGeneration"L
KimiK25ForConditionalGeneration"&
DeepseekV3ForCausalLM
 8"fuzz-a*0