
	bad name!&
DeepseekV3ForCausalLM
 8*0