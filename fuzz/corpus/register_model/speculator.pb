

seed-draft&
DeepseekV3ForCausalLM
 8"fuzz-a*0