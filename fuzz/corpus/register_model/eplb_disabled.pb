
seed-off&
DeepseekV3ForCausalLM
 8*