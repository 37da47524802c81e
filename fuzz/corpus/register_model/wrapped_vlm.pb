
seed-vlmN
KimiK25ForConditionalGeneration"(
DeepseekV3ForCausalLM 8@*0