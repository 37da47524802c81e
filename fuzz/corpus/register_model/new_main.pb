
seed-new&
DeepseekV3ForCausalLM
 8*0