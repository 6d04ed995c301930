"""Client side: what the story app's backend runs against the RunPod API (not in the container)."""
