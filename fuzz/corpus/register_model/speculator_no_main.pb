
seed-orphan&
DeepseekV3ForCausalLM
 8"nope*0