//! LoRA injection: match target modules like PEFT, initialise A and B, attach branches to
//! `AdaptedLinear` layers, and collect the trainable tensors.
