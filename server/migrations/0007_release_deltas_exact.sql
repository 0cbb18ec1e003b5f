-- Delta sizes are now computed by the same request plan the updater
-- fetches by (protocol::plan), which counts every byte a device reads.
-- Sizes cached by earlier versions were 5,120 bytes short per image: drop
-- them; the next preview computes each pair again. Portable SQL, as 0001.
DELETE FROM release_deltas;
