
fuzz-a&
DeepseekV3ForCausalLM
 8*0