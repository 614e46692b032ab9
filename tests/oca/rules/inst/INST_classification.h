if DPR.CATG == "SCIENCE" and DPR.TECH like "%PRE%" then
{
  DO.CATG = "IMG_PREIMAGING";
}
if DPR.CATG == "CALIB" and DPR.TYPE == "DARK" then
{
  DO.CATG = "DARK";
}
