"""The fleet: VM hosts (`mvm host`) and stateless edge workers (`mvm edge`) sharing one catalog."""
