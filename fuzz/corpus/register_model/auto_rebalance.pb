
	seed-auto&
DeepseekV3ForCausalLM
 8* (08