-- The share of reads shadowed, in millionths, when set at run time (RolloutService.
-- SetShadowSampleRate); NULL: each replica uses its --shadow-sample-rate.
ALTER TABLE rollout_state ADD COLUMN IF NOT EXISTS shadow_sample_ppm BIGINT;
