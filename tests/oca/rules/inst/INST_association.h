action PRE
{
  minRet = 1; maxRet = 1;
  select file as MASTER_DARK from calibFiles where PRO.CATG == "MASTER_DARK"
    and inputFile.DET.DIT == DET.DIT;
  minRet = 1; maxRet = 1;
  select file as MASTER_FLAT from calibFiles where PRO.CATG == "MASTER_FLAT"
    and SAME_SETUP and RECENT(FLAT_DAYS);
  recipe inst_pre;
}
action DARKS
{
  recipe inst_dark;
  product MASTER_DARK { PRO.CATG = "MASTER_DARK"; }
}
