"""The loader kinds (resident, torch, dali, folder) over a pack, and the batched augmentation they share."""
